"""``acelora bench``: images/s of a full ACE-LoRA training step and of zero-shot inference.

* :mod:`.train_cases` — the training-step cases (``reference``, ``default``, ``compile``) and
  ``training_forward``, which runs the step through ``acelora.models.task.ContrastiveTask``;
  :mod:`.reference` — the research code's formulation the ``reference`` case runs;
  :mod:`.inference` — zero-shot cases (base model, merged adapters, merged without HGNN);
  :mod:`.inputs` — synthetic images, reports and labels.
* :mod:`.timing` — medians/p10/p90 after warm-up (CUDA events on a GPU, ``perf_counter`` on the
  CPU; round-robin on the CPU so that machine load hits every case alike), peak memory, FLOPs
  (``torch.utils.flop_counter.FlopCounterMode``); :mod:`.environment` — device, versions, commit,
  load, the device's peak FLOP/s for model-FLOPs utilisation.
* :mod:`.report` — table, speed-ups, JSON; :mod:`.phase_profile` — chrome trace and per-phase table.
* :mod:`.runner` — ``run()``; :mod:`.cli` — the command.
"""
from acelora.benchmark.cli import add_arguments, add_commands, main_from_args  # noqa: F401
from acelora.benchmark.environment import (FLOPS_NOTE, PEAK_FLOPS, device_peak_flops,  # noqa: F401
                                           device_tag, env_info)
from acelora.benchmark.inference import (INFERENCE_CASES, build_inference_case,  # noqa: F401
                                         run_inference_cases)
from acelora.benchmark.inputs import Batch, make_batch, synthetic_labels, synthetic_texts  # noqa: F401
from acelora.benchmark.reference import (DenseHGNN, SplitLoRAQKV, dense_hgnn,  # noqa: F401
                                         explicit_attention, split_qkv_lora)
from acelora.benchmark.report import TABLE_COLUMNS, format_table  # noqa: F401
from acelora.benchmark.runner import CASES, parse_cases, resolve_devices, run  # noqa: F401
from acelora.benchmark.timing import (count_flops, quantile, summarise, time_interleaved,  # noqa: F401
                                      time_steps)
from acelora.benchmark.train_cases import (TRAIN_CASES, TrainCase, build_train_case,  # noqa: F401
                                           run_train_case, run_train_cases, training_forward)
from acelora.profiling import remove_hooks  # noqa: F401
