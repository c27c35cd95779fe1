"""What every layer shares: errors (`errors`), settings and model profiles (`profiles`, the only reader of
the environment), input checks (`inputs`), and the seam between the views and an engine (`seam`).

Imports the standard library only, so the UI, a remote backend and the tests can use it without loading torch.
"""
