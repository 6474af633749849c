"""Running a loaded model on chat-formatted queries.

`chat` formats a query under a prompt setting, `encoding` tokenizes a query set
once (the result is reused by every pass), `batching` pads it into few shapes;
`represent`, `refusal_score` and `respond` (on the `generate` engine) are the
three passes, and `judges` decide which replies are refusals.
"""
