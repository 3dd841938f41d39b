"""Federation: the client's local round, the server's round loop, aggregation strategies, defences,
upload compression, checkpoints and the Flower ServerApp / ClientApp."""
