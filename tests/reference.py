"""Float64 NumPy/SciPy references and random sparse inputs for the tests."""

import numpy as np
import scipy.sparse as sps


def random_sparse(rng, n_in, n_out, density, *, empty_rows=0.0, dtype=np.float64):
    """A random ``scipy.sparse.csc_matrix`` [n_in, n_out]; some output columns emptied."""
    m = sps.random(n_in, n_out, density=density, format="csc", dtype=np.float64, random_state=rng)
    m.data = rng.standard_normal(m.nnz)
    if empty_rows > 0 and n_out > 0:
        dead = rng.random(n_out) < empty_rows
        m = m @ sps.diags((~dead).astype(np.float64))
        m = sps.csc_matrix(m)
        m.eliminate_zeros()
    return m.astype(dtype)


def sparse_linear_ref(x, w, bias=None, activation="relu", clip=None):
    """float64 ``min(act(x @ w + bias), clip)`` for dense or scipy ``w`` [n_in, n_out]."""
    x = np.asarray(x, dtype=np.float64)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    w = w.toarray() if sps.issparse(w) else np.asarray(w)
    z = x2 @ w.astype(np.float64)
    if bias is not None:
        z = z + np.asarray(bias, dtype=np.float64)
    if activation == "relu":
        z = np.maximum(z, 0.0)
    if clip is not None:
        z = np.minimum(z, clip)
    return z.reshape(lead + (w.shape[1],))


# Relative accuracy of the accumulation and of the stored output, by feature dtype.
_ACC_EPS = {"float32": 2e-6, "float64": 1e-14, "bfloat16": 2e-6, "float16": 2e-6}
_OUT_EPS = {"float32": 0.0, "float64": 0.0, "bfloat16": 2.0**-8, "float16": 2.0**-11}


def assert_matches_ref(y, x, w, bias=None, activation="relu", clip=None):
    """Checks ``y`` against the float64 reference with an error bound that scales
    with the magnitude of the sum (|x| @ |w| + |b|) and the output dtype."""
    dt = np.dtype(y.dtype).name
    xf = np.asarray(x).astype(np.float64)  # features as stored (half rounding already applied)
    ref = sparse_linear_ref(xf, w, bias, activation, clip)
    wa = abs(w) if sps.issparse(w) else np.abs(np.asarray(w))
    mag = sparse_linear_ref(np.abs(xf), wa, None if bias is None else np.abs(bias), None, None)
    bound = _ACC_EPS[dt] * (mag + 1.0) * np.sqrt(max(xf.shape[-1], 1))
    bound = bound + _OUT_EPS[dt] * np.abs(ref)
    yf = np.asarray(y).astype(np.float64)
    assert yf.shape == ref.shape, (yf.shape, ref.shape)
    err = np.abs(yf - ref)
    if not np.all(err <= bound):
        k = np.unravel_index(np.argmax(err - bound), err.shape)
        raise AssertionError(
            f"sparse_linear mismatch at {k}: got {yf[k]}, want {ref[k]}, err {err[k]:.3g} "
            f"> bound {bound[k]:.3g}"
        )
    if clip is not None:
        assert np.all(yf <= clip)
    if activation == "relu":
        assert np.all(yf >= 0)


def conv2d_ref(x, w, strides, pads, dilation, groups, bias=None, activation=None):
    """float64 NCHW convolution with OIHW ``w``, as ``lax.conv_general_dilated`` defines it:
    zero padding (negative pads crop), filter dilation, feature groups."""
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    b, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    (pt, pb), (pl, pr) = pads
    sh, sw = strides
    dh, dw = dilation
    xp = np.zeros((b, c, h + max(pt, 0) + max(pb, 0), wd + max(pl, 0) + max(pr, 0)))
    xp[:, :, max(pt, 0) : max(pt, 0) + h, max(pl, 0) : max(pl, 0) + wd] = x
    xp = xp[:, :, max(-pt, 0) : xp.shape[2] - max(-pb, 0), max(-pl, 0) : xp.shape[3] - max(-pr, 0)]
    span_h, span_w = xp.shape[2] - ((kh - 1) * dh + 1), xp.shape[3] - ((kw - 1) * dw + 1)
    oh = span_h // sh + 1 if span_h >= 0 else 0
    ow = span_w // sw + 1 if span_w >= 0 else 0
    y = np.zeros((b, o, oh, ow))
    og = o // groups
    for g in range(groups):
        xs = xp[:, g * cg : (g + 1) * cg]
        ws = w[g * og : (g + 1) * og]
        for r in range(kh):
            for s in range(kw):
                patch = xs[
                    :,
                    :,
                    r * dh : r * dh + (oh - 1) * sh + 1 : sh,
                    s * dw : s * dw + (ow - 1) * sw + 1 : sw,
                ]
                if oh and ow:
                    y[:, g * og : (g + 1) * og] += np.einsum("bchw,oc->bohw", patch, ws[:, :, r, s])
    if bias is not None:
        y = y + np.asarray(bias, dtype=np.float64)[None, :, None, None]
    if activation == "relu":
        y = np.maximum(y, 0.0)
    return y
