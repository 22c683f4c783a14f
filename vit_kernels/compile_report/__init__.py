"""See the H100 without one: every Triton kernel compiled for sm_90 as the host code launches it.

``python -m vit_kernels compile-report [--full] [--json PATH] [--markdown PATH] [--check]``

- ``launches``: the launch variants, recorded from real vit_kernels code run on meta tensors;
- ``sm90``: specialise a launch as Triton would on an H100, compile it, read the cubin;
- ``report``: rows per kernel x variant x config, the gate's rules, markdown and JSON.
"""
