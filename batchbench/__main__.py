from batchbench.main import run

run()
