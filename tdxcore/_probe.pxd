# Sanitizer probes (see _probe.pyx). Nothing is shared at C level: this module exists only to
# prove that the TDXCORE_SANITIZE=1 build is instrumented, through tdxcore._testing.
