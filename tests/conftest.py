import torch

# Tests run many small tensor ops; one thread keeps them fast and deterministic on 2 cores.
torch.set_num_threads(1)
