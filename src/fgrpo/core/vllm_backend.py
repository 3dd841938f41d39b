"""Optional vLLM rollouts behind the same interface as `rollout.generate`.

For 1B+ models, sampling dominates a GRPO step, and vLLM's paged attention and
continuous batching sample several times faster than HF generate. The policy
still trains in transformers: before each rollout batch the current LoRA
adapter is saved and handed to vLLM as a new `LoRARequest`, so vLLM samples
from the same weights the loss is computed on. Prompts are tokenized here, by
the training tokenizer, so both sides see identical prompt ids.

Untested in CI (it needs vLLM and a GPU); imported only when
`model.generation_backend = "vllm"`.
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

import torch

from fgrpo.config import ModelConfig
from fgrpo.errors import ConfigError
from fgrpo.core.grpo import completion_mask_after_eos
from fgrpo.core.rollout import Rollouts


class VLLMGenerator:
    """Callable with `rollout.generate`'s signature, sampling with a vLLM engine built on first use."""

    def __init__(self, model: ModelConfig, source: str):
        if importlib.util.find_spec("vllm") is None:
            raise ConfigError(
                "model.generation_backend = 'vllm' but vLLM is not installed (pip install vllm, CUDA only); "
                "use generation_backend = 'hf'"
            )
        if not model.lora.enabled:
            raise ConfigError("model.generation_backend = 'vllm' needs model.lora.enabled = true (adapters are synced, not full weights)")
        if model.quantization != "none":
            raise ConfigError("model.generation_backend = 'vllm' does not support model.quantization; use 'none'")
        self.config = model
        self.source = source
        self.llm = None
        self.version = 0
        self.adapter_root = Path(tempfile.mkdtemp(prefix="fgrpo-vllm-"))

    def _engine(self):
        if self.llm is None:
            from vllm import LLM

            dtype = "auto" if self.config.dtype == "auto" else self.config.dtype
            self.llm = LLM(
                model=self.source,
                dtype=dtype,
                enable_lora=True,
                max_lora_rank=self.config.lora.rank,
                gpu_memory_utilization=self.config.vllm_gpu_memory_utilization,
            )
        return self.llm

    def _adapter(self, model):
        """Save the current adapter and return a LoRARequest for it (a new id, so vLLM reloads it)."""
        from vllm.lora.request import LoRARequest

        self.version += 1
        path = self.adapter_root / f"v{self.version}"
        model.save_pretrained(path)
        return LoRARequest(f"fgrpo-{self.version}", self.version, str(path))

    @torch.no_grad()
    def __call__(
        self,
        model,
        tokenizer,
        prompts: list[str],
        num_generations: int,
        max_completion_length: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        greedy: bool = False,
        add_special_tokens: bool = True,
        share_prompts: bool = True,  # vLLM shares prompt prefixes itself (prefix caching)
    ) -> Rollouts:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        device = next(model.parameters()).device
        prompt_ids = [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts]
        params = SamplingParams(
            n=num_generations,
            temperature=0.0 if greedy else temperature,
            top_p=1.0 if greedy else top_p,
            max_tokens=max_completion_length,
        )
        outputs = self._engine().generate(
            [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids],
            params,
            lora_request=self._adapter(model),
            use_tqdm=False,
        )
        pad = tokenizer.pad_token_id
        width = max(len(ids) for ids in prompt_ids)
        rows, masks, completions = [], [], []
        for ids, output in zip(prompt_ids, outputs):
            for sample in output.outputs:  # the G samples of this prompt, contiguous like HF's layout
                rows.append([pad] * (width - len(ids)) + list(ids))
                masks.append([0] * (width - len(ids)) + [1] * len(ids))
                completions.append(list(sample.token_ids))
        length = max(1, max(len(c) for c in completions))
        completion_ids = torch.tensor([c + [pad] * (length - len(c)) for c in completions], device=device)
        completion_mask = completion_mask_after_eos(completion_ids, tokenizer.eos_token_id)
        completion_ids = completion_ids.masked_fill(completion_mask == 0, pad)
        texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        return Rollouts(
            torch.tensor(rows, device=device), torch.tensor(masks, device=device), completion_ids, completion_mask, texts,
            num_generations,
        )
