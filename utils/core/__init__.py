"""What every layer shares: errors (`errors`), settings and model profiles (`profiles`, the only reader of
the environment), input checks (`inputs`), and the seam between the views and an engine (`seam`).

May import the standard library only (at import time; `profiles.gpu_available` asks torch lazily), so the
UI's presentation, a remote backend and the tests can use it without loading torch.
"""
