"""The sample log's storage: record schema (records), segment files (segments), Redis streams
(streams) and the readers with offsets (source). Serving writes it (engine.app.samplelog), the
joiner reads it (model_export.join); both import it from here, below them."""
