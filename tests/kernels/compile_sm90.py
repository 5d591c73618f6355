"""Compiles every Triton kernel of splitlora_kernels for an H100 (sm_90) without a GPU.

Run by test_compile_sm90.py in a process of its own: the test session imports the kernels under
TRITON_INTERPRET=1, which wraps them for the interpreter, and the interpreter accepts code that
the GPU compiler rejects. triton.compile needs no device, only triton's bundled LLVM and ptxas,
so a kernel change that would fail to compile on the GPU fails here, in CI.

Each variant is a set of constexprs a launch function uses; pointer and integer types follow the
launches closely enough for the compiler's checks (bf16 tensors, fp32 partial buffers).
Prints one line per variant and exits 1 at the first failure, with its error.
"""
import importlib
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

ll = importlib.import_module("splitlora_kernels.ops.lora_linear")
ml = importlib.import_module("splitlora_kernels.ops.multi_lora")

TARGET = GPUTarget("cuda", 90, 32)
FP32_BUFFERS = {"ga_ptr", "gb_ptr", "cs_ptr", "scal_ptr"}  # fp32 partials and scalings
FLOAT_SCALARS = {"p_drop", "drop_scale", "scaling"}


def signature(fn, constexprs: dict, dtype: str) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name == "table_ptr":
            sig[name] = "*i64"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32" if name in FP32_BUFFERS else f"*{dtype}"
        elif name in FLOAT_SCALARS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def compile_variant(fn, constexprs: dict, dtype: str = "bf16", num_stages: int = 3):
    src = ASTSource(fn=fn, signature=signature(fn, constexprs, dtype),
                    constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=TARGET, options={"num_warps": 4, "num_stages": num_stages})


R = dict(R_PAD=16, UPCAST=False, PRECISION="tf32")
ROW_TILES = dict(BLOCK_M=32, BLOCK_K=64, BLOCK_N=64)
COL_TILES = dict(BLOCK_M=64, BLOCK_D=64)
VARIANTS = [
    # lora_linear: the forward row pass (dropout, bias), the backward one (dX epilogue through the
    # dropout mask), the two-launch epilogue (LOAD_L), the column pass, the finishing kernel.
    ("rowpass forward", ll._lora_rowpass_kernel, dict(IN_DROPOUT=True, LOAD_L=False, STORE_L=True, EPILOGUE=True,
                                                       OUT_DROPOUT=False, HAS_BIAS=True, **R, **ROW_TILES)),
    ("rowpass backward", ll._lora_rowpass_kernel, dict(IN_DROPOUT=False, LOAD_L=False, STORE_L=True, EPILOGUE=True,
                                                        OUT_DROPOUT=True, HAS_BIAS=False, **R, **ROW_TILES)),
    ("rowpass epilogue only", ll._lora_rowpass_kernel, dict(IN_DROPOUT=False, LOAD_L=True, STORE_L=False,
                                                             EPILOGUE=True, OUT_DROPOUT=False, HAS_BIAS=True, **R,
                                                             **ROW_TILES)),
    ("colpass", ll._lora_colpass_kernel, dict(TASK_A=True, TASK_B_GRAD=True, TASK_B_COLSUM=True, DROPOUT=True, **R,
                                              **COL_TILES)),
    ("finish", ll._lora_finish_kernel, dict(HAS_A=True, HAS_B=True, HAS_BIAS=True, S_BLOCK=8, BLOCK=512)),
    ("matmul lora in K loop", ll._lora_matmul_kernel, dict(HAS_BIAS=False, LORA_MODE=2, STORE_L=True, DROPOUT=True,
                                                           **R, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8)),
    ("matmul lora epilogue", ll._lora_matmul_kernel, dict(HAS_BIAS=True, LORA_MODE=1, STORE_L=False, DROPOUT=False,
                                                          **R, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8)),
    ("dropout mask", ll._dropout_mask_kernel, dict(BLOCK_M=32, BLOCK_D=32)),
    # multi_lora: forward and backward row passes with dropout, the column pass (partials,
    # dropout), the finishing kernel.
    ("multi rowpass forward", ml._multi_rowpass_kernel, dict(BACKWARD=False, STORE_L=True, EPILOGUE=True, HAS_BIAS=True,
                                                             IN_DROPOUT=True, OUT_DROPOUT=False, **R, **ROW_TILES)),
    ("multi rowpass backward", ml._multi_rowpass_kernel, dict(BACKWARD=True, STORE_L=True, EPILOGUE=True,
                                                              HAS_BIAS=False, IN_DROPOUT=False, OUT_DROPOUT=True, **R,
                                                              **ROW_TILES)),
    ("multi colpass", ml._multi_colpass_kernel, dict(TASK_A=True, TASK_B_GRAD=True, TASK_B_COLSUM=True, PARTIAL=True,
                                                     CS_PARTIAL=True, DROPOUT=True, **R, **COL_TILES)),
    ("multi finish", ml._multi_finish_kernel, dict(HAS_A=True, HAS_B=True, HAS_BIAS=True, S_BLOCK=8, BLOCK=512)),
]


def main() -> int:
    for name, fn, constexprs in VARIANTS:
        start = time.perf_counter()
        try:
            kernel = compile_variant(fn, constexprs)
        except Exception as exc:  # report which variant, then fail
            print(f"FAILED {name}: {type(exc).__name__}: {exc}", flush=True)
            return 1
        print(f"ok {name}: {len(kernel.asm['cubin'])} bytes of sm_90 cubin, {time.perf_counter() - start:.1f} s",
              flush=True)
    print(f"all {len(VARIANTS)} variants compiled", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
