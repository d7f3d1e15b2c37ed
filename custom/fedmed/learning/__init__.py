"""How the model learns and is scored: training loops, federated optimisers (FedOpt, FedProx, SCAFFOLD), metrics."""
