"""Plain-Python twins of the Cython cores, for the differential tests only.

Each twin has its core's class name, methods, argument order and results down to each status
bit, written to be obvious. The package never imports these, and they never import a core.
"""
