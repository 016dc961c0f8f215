"""Zero-shot classification, multi-label evaluation, prompts, metrics, downstream tasks."""
from acelora.eval.downstream import detection_evaluate, segmentation_evaluate  # noqa: F401
from acelora.eval.multilabel import MultiLabelCSVDataset, multilabel_evaluate  # noqa: F401
from acelora.eval.predict import predict  # noqa: F401
from acelora.eval.zeroshot import ZeroShotClassifier, class_embeddings, zero_shot_evaluate  # noqa: F401
