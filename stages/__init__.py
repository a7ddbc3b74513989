"""One module per stage kind. Recall routes are `(ctx) -> Candidates`; every other stage is
`(ctx, Candidates) -> Candidates`. A stage only transforms candidates: timing, budgets,
tracing and fail-open belong to the engine's runner. Each kind declares in its `register()`
call (engine.core.registry) its Params, its policy and every column it reads and writes."""
