"""What an evaluate report (reports/eval/metrics.json) calls its methods: written by the evaluate stage, read by
the release gate and `sempcyc report`, so the names live here once."""

# The no-training baselines: ImageNet features matched directly, the same features with each domain's seen-class
# mean removed (then L2), the same with each photo read as the mean of its and its edge map's features, the
# features exactly as the model's input normalisation reads them (its centring and whitening, fitted on the training
# classes: what SEM-PCYC starts from), and a random ranking. The strongest per setting is the one to beat.
BASELINES = ("pretrained", "pretrained_centred", "pretrained_centred_edges", "pretrained_model_input", "random")
