"""SVB/BBN model zoo: importing this package registers the models with timm."""

from .convnet import *  # noqa: F403
from .inception_resnet_v2_preact import *  # noqa: F403
from .preact_resnet import *  # noqa: F403
from .resnet_svb import *  # noqa: F403
from .wide_resnet import *  # noqa: F403
