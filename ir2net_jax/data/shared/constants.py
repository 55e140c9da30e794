"""The numbers of the augmentation recipes, shared by every input engine.

Pixel statistics are on the 0..1 scale (``ToTensor`` then ``Normalize``),
paddings in pixels of the model's input. No TensorFlow here: the on-device
engine (``on_device``) reads them where TensorFlow is not installed.
"""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_PCA_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)
LIGHTING_ALPHASTD = 0.1
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
CIFAR_PADDING = 4
DIGITS_PADDING = 2
DIGITS_MEAN = (0.5, 0.5, 0.5)
DIGITS_STD = (0.5, 0.5, 0.5)


def small_padding(image_size: int) -> int:
  """Zero padding of the CIFAR recipe's random crop: 4 at 32, in proportion
  elsewhere (at least 1)."""
  return max(1, round(image_size * CIFAR_PADDING / 32))
