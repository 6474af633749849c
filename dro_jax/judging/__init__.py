"""Judging replies: which are refusals, which are unsafe, which of two is the more helpful.

`judges` holds the refusal judges (the string judges and the `RefusalJudge`
protocol), the judge model (`ModelJudge`, the `SafetyJudge` protocol) and the
paper's compliance rule that combines them; `declines` the decline judge;
`responses` generates replies and judges them (`judged_responses`, the one
sample-then-judge of the anchor labels and of every evaluation); `pairwise`
the helpfulness judges.
"""
