"""Running a loaded model on chat-formatted queries.

`chat` formats a query under a prompt setting, `encoding` tokenizes a query set
once (the result is reused by every pass), `padding` pads it into few shapes,
`batched` runs every pass's batches; `represent`, `refusal_score`,
`likelihood` and `generate` are the passes. Judging their replies is
`dro_jax.judging`'s.
"""
