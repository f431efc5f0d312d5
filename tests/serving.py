from viper_server.testing import ServerProcess  # noqa: F401  (moved; temporary shim)
