"""The anchor stage: refusal labels (`labels`), the anchor data under every prompt setting (`collect`),
and the space fitted to it: PCA axes, refusal and harmfulness probes (`space`)."""
