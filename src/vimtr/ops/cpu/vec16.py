"""16 floats as one LLVM vector value: the N = 16 scan kernels keep a row's 16 states in it.

With the state count N known only at run time, LLVM vectorises the scan's state loops 32 at a time and
N = 16 only ever ran their 4-wide remainder, behind run-time alias checks, at every token. With N fixed
at compile time the loops are fully unrolled and then left scalar (the SLP vectoriser cannot prove the
unrolled loads and stores independent). So Vim's state size gets a numba type of its own, ``Vec16``
(<16 x float>: two AVX2 registers), loaded and stored whole, with arithmetic as intrinsics: the states
stay in registers across tokens and nothing is left for the vectorisers to decide. The scan forward and
backward with it were 1.1-1.2x and 2.3-3.5x faster per call than the loop kernels (docs/performance.md).

Inside compiled code, ``+ - *`` work on two vectors or a vector and a scalar (broadcast).
"""
from __future__ import annotations

import operator

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, overload, register_model

from vimtr.ops.cpu.runtime import EXP2_POLY, FM_EXACT, FM_KERNEL, MAGIC, YMIN


class Vec16(types.Type):
    """16 values of one float dtype as one LLVM vector (<16 x float>: two AVX2 registers)."""

    def __init__(self, dtype):
        self.dtype = dtype
        super().__init__(name=f"Vec16({dtype})")


@register_model(Vec16)
class Vec16Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, ir.VectorType(dmm.lookup(fe_type.dtype).get_value_type(), 16))


_VEC_FLAGS = tuple(sorted(FM_KERNEL))  # the kernels' own fast-math flags (reassociation, FMA contraction)


def _vec_ptr(context, builder, aryty, ary, i, ity):
    data = context.make_array(aryty)(context, builder, ary).data
    p = builder.gep(data, [context.cast(builder, i, ity, types.intp)])
    return builder.bitcast(p, context.get_value_type(Vec16(aryty.dtype)).as_pointer())


@intrinsic
def vload(typingctx, ary, i):
    """ary's elements i .. i+15 (flat index into a C-contiguous array) as one vector."""
    if isinstance(ary, types.Array) and ary.layout == "C" and isinstance(i, types.Integer):
        vt = Vec16(ary.dtype)

        def codegen(context, builder, sig, args):
            ptr = _vec_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
            return builder.load(ptr, align=context.get_abi_sizeof(context.get_value_type(ary.dtype)))
        return vt(ary, i), codegen
    return None


@intrinsic
def vstore(typingctx, ary, i, v):
    """ary[i:i+16] = v."""
    if (isinstance(ary, types.Array) and ary.layout == "C" and isinstance(i, types.Integer)
            and v == Vec16(ary.dtype)):
        def codegen(context, builder, sig, args):
            ptr = _vec_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
            builder.store(args[2], ptr, align=context.get_abi_sizeof(context.get_value_type(ary.dtype)))
            return context.get_dummy_value()
        return types.none(ary, i, v), codegen
    return None


@intrinsic
def vsplat(typingctx, x, like):
    """x in all 16 lanes, in the dtype of the vector ``like``."""
    if isinstance(like, Vec16) and isinstance(x, (types.Float, types.Integer)):
        def codegen(context, builder, sig, args):
            vty = context.get_value_type(like)
            s = context.cast(builder, args[0], sig.args[0], like.dtype)
            v = builder.insert_element(ir.Constant(vty, ir.Undefined), s, ir.Constant(ir.IntType(32), 0))
            return builder.shuffle_vector(v, ir.Constant(vty, ir.Undefined),
                                          ir.Constant(ir.VectorType(ir.IntType(32), 16), [0] * 16))
        return like(x, like), codegen
    return None


@intrinsic
def vzeros(typingctx, ary):
    """16 zeros of ary's dtype."""
    if isinstance(ary, types.Array):
        vt = Vec16(ary.dtype)

        def codegen(context, builder, sig, args):
            return ir.Constant(context.get_value_type(vt), None)
        return vt(ary), codegen
    return None


@intrinsic
def vsum(typingctx, v):
    """Σ of the 16 lanes (a reassociated tree: shuffles and adds)."""
    if isinstance(v, Vec16):
        def codegen(context, builder, sig, args):
            sty = context.get_value_type(v.dtype)
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(sty, [sty, args[0].type]),
                                                f"llvm.vector.reduce.fadd.v16f{v.dtype.bitwidth}")
            return builder.call(fn, [ir.Constant(sty, 0.0), args[0]], fastmath=_VEC_FLAGS)
        return v.dtype(v), codegen
    return None


@intrinsic
def vsum16(typingctx, ary, i):
    """The lane sums of the 16 vectors ary[i + 16k : i + 16k + 16], k < 16, as one vector (lane k: Σ of
    vector k). A tree of 15 two-vector steps (two shuffles and one add each) instead of 16 separate
    horizontal sums (four shuffles and four adds each): the per-token sum of the forward cost it 36%.
    Each lane is summed in the order llvm.vector.reduce.fadd uses (halves, then quarters, ...), so the
    bits are :func:`vsum`'s."""
    if isinstance(ary, types.Array) and ary.layout == "C" and isinstance(i, types.Integer):
        vt = Vec16(ary.dtype)

        def codegen(context, builder, sig, args):
            align = context.get_abi_sizeof(context.get_value_type(ary.dtype))
            vs = []
            for k in range(16):
                ik = builder.add(args[1], ir.Constant(args[1].type, 16 * k))
                vs.append(builder.load(_vec_ptr(context, builder, sig.args[0], args[0], ik, sig.args[1]), align=align))
            w = 16  # lanes per token in each vector: 16 tokens' partial sums halve in width at every level
            while len(vs) > 1:
                h, t = w // 2, 16 // w
                lo = [g * w + j for g in range(t) for j in range(h)]
                hi = [g * w + h + j for g in range(t) for j in range(h)]
                nxt = []
                for a, b in zip(vs[::2], vs[1::2]):
                    ma = ir.Constant(ir.VectorType(ir.IntType(32), 16), lo + [16 + x for x in lo])
                    mb = ir.Constant(ir.VectorType(ir.IntType(32), 16), hi + [16 + x for x in hi])
                    nxt.append(builder.fadd(builder.shuffle_vector(a, b, ma), builder.shuffle_vector(a, b, mb),
                                            flags=_VEC_FLAGS))
                vs, w = nxt, h
            return vs[0]
        return vt(ary, i), codegen
    return None


def _vec_binop(opname):
    @intrinsic
    def op(typingctx, x, y):
        if isinstance(x, Vec16) and x == y:
            def codegen(context, builder, sig, args):
                return getattr(builder, opname)(args[0], args[1], flags=_VEC_FLAGS)
            return x(x, y), codegen
        return None
    return op


_vadd, _vsub, _vmul = _vec_binop("fadd"), _vec_binop("fsub"), _vec_binop("fmul")


def _vec_intrinsic(builder, name, vty, args):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty] * len(args)), name)
    return builder.call(fn, args)


@intrinsic
def vfma(typingctx, x, y, w):
    """x·y + w in each lane with one rounding (llvm.fma). The forward recurrence h = dA·h + Δu·B is
    written with it so that its loop-carried path is one FMA: left to contraction, LLVM fused Δu·B
    instead and kept dA·h as a separate multiply, a multiply and an FMA per token on the chain."""
    if isinstance(x, Vec16) and x == y == w:
        def codegen(context, builder, sig, args):
            return _vec_intrinsic(builder, f"llvm.fma.v16f{x.dtype.bitwidth}", context.get_value_type(x), args)
        return x(x, y, w), codegen
    return None


@intrinsic
def vdecay_fast(typingctx, y):
    """:func:`decay_fast` in all 16 lanes: for float32 the instructions of :func:`runtime._exp2_nonpos_f32`
    (clamp as numba's ``max``, magic-number rounding, the same FMA chain, the exponent added as an
    integer), so the same bits in vector registers; for float64 llvm.exp per lane (math.exp's)."""
    if isinstance(y, Vec16) and y.dtype in (types.float32, types.float64):
        def codegen(context, builder, sig, args):
            vty = context.get_value_type(y)
            if y.dtype == types.float64:
                return _vec_intrinsic(builder, "llvm.exp.v16f64", vty, args)

            def c(x):
                return ir.Constant(vty, [float(x)] * 16)
            # Explicit flags: numba gives the kernel's own (reassoc) to every fp instruction that has none,
            # and reassociation would cancel y - ((y + M) - M) to 0.
            fl = tuple(FM_EXACT)
            i32v = ir.VectorType(ir.IntType(32), 16)
            x = args[0]
            x = builder.select(builder.fcmp_ordered(">", c(YMIN), x, flags=fl), c(YMIN), x)  # max(y, YMIN)
            t = builder.fadd(x, c(MAGIC), flags=fl)
            f = builder.fsub(x, builder.fsub(t, c(MAGIC), flags=fl), flags=fl)
            p = c(EXP2_POLY[0])
            for k in EXP2_POLY[1:]:
                p = _vec_intrinsic(builder, "llvm.fma.v16f32", vty, [p, f, c(k)])
            k23 = builder.shl(builder.bitcast(t, i32v), ir.Constant(i32v, [23] * 16))
            return builder.bitcast(builder.add(builder.bitcast(p, i32v), k23), vty)
        return y(y), codegen
    return None


def _vec_operator(vop):
    """Typer for a vector operator: vector ∘ vector, and a scalar on either side (broadcast)."""
    def typer(x, y):
        if isinstance(x, Vec16) and x == y:
            return lambda x, y: vop(x, y)
        if isinstance(x, Vec16) and isinstance(y, (types.Float, types.Integer)):
            return lambda x, y: vop(x, vsplat(y, x))
        if isinstance(y, Vec16) and isinstance(x, (types.Float, types.Integer)):
            return lambda x, y: vop(vsplat(x, y), y)
        return None
    return typer


overload(operator.add)(_vec_operator(_vadd))
overload(operator.sub)(_vec_operator(_vsub))
overload(operator.mul)(_vec_operator(_vmul))
