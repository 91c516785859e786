"""What a FLUX model is: its parts, sizes, artifact format and loader.

Importing it caps oneDNN below AMX unless the operator chose an ISA (`ONEDNN_MAX_CPU_ISA`): on CPUs with AMX
(Sapphire Rapids and later) oneDNN picks its bf16 matmul kernel by the number of rows, so an image's bytes
would depend on the batch it shared and differ from other CPUs'. AVX-512 BF16 kernels give every row the
same bytes in any batch. oneDNN reads the variable at its first matmul, so it is set here, before any.
"""

import os

os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
