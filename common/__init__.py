"""The shared contract of fedmeta: wire code, tensor codec, models, tasks, algorithms, config."""

PROTOCOL_VERSION = 1

# Call metadata key carrying the client id (checked with the token by the server).
CLIENT_ID_METADATA = "fedmeta-client-id"
