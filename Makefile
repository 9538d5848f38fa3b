# The two commands of the README. Both work on a fresh machine (package registries only).
.PHONY: setup demo test

setup:
	bash scripts/setup.sh

# Main job: a small real study (Fashion-MNIST, 16 trials) and its report.
demo: setup
	.venv/bin/study run demo --name demo-$$(date +%Y%m%d-%H%M%S) --yes
	.venv/bin/study report $$(ls -d results/demo-* | tail -n 1)

# All tests, slow ones included (CI runs exactly this).
test: setup
	.venv/bin/python -m pytest tests -q
