"""Scale-out with PyTorch-native parallelism, applied to a built model from outside
(torchtitan style): the model files import nothing from torch.distributed."""
