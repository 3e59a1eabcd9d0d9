"""Hand-written kernels over raw arrays (NumPy or CuPy; never core.Tensor), one subpackage per family:
attention, conv, gumbel, schedule — each as reference.py (NumPy spec), cpu.py (Numba), cuda.py (numba.cuda).
`kernels.philox` is the counter-based generator their noise comes from. Import the families explicitly
(`from kernels import gumbel`); this package imports nothing itself.
"""
