"""Image constants shared by training, evaluation and the data pipelines (no heavy imports, so any
module can take them)."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # per-channel RGB mean of ImageNet, on [0, 1] pixels
IMAGENET_STD = (0.229, 0.224, 0.225)
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, the weights of PIL's convert("L") and torchvision's rgb_to_grayscale
