"""The public throughput anchors the measured figures are compared with (docs/reference.md section 2).

Standard library only: ``benchmarks/gpu_table.py`` imports it without torch.
"""

# BYOL ResNet-50 224 px on 8x V100 with AMP (compute bound), and the linear-evaluation figure
# DeepSparkHub reports for its mmpretrain-based BYOL recipe on 8 GPUs.
TARGET_BYOL_8XV100 = 3121.0
TARGET_LINEAR_8GPU = 5408.0
# Other public anchors drawn beside the measured bars on a GPU (same section).
PEERS = {"BYOL 1x V100 AMP (anchor)": 450.0, "BYOL 1x A100 AMP (anchor)": 926.0,
         "BYOL 8x V100 AMP (target)": TARGET_BYOL_8XV100}
