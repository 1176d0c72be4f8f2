"""The shared contract of fedmeta: wire code, tensor codec, models, tasks, algorithms, config."""

PROTOCOL_VERSION = 1
