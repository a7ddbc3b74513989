"""recserve serving engine: request context, candidates, pipeline runner, bundle, feature store, server."""
