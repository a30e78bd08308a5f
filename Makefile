# Thin wrappers: each target is one script, so the same works without make.
#   make demo    scripts/demo.sh    set up .venv and run the offline quickstart recipe
#   make test    scripts/test.sh    set up .venv and run the fast test suite (ARGS=... for pytest)
#   make setup   scripts/setup.sh   only set up .venv
.PHONY: demo test setup
demo:
	scripts/demo.sh $(ARGS)
test:
	scripts/test.sh $(ARGS)
setup:
	scripts/setup.sh
