"""viper-serve's web gateway: the viper.v1 API over Connect and gRPC-Web, and the ViPer web page."""

from .app import Gateway, Settings

__version__ = "0.1.0"
__all__ = ["Gateway", "Settings", "__version__"]
