# The two commands of the README's quick start. Both install what is missing first.
.PHONY: setup demo test

setup:
	bash .ci/setup.sh

demo: setup
	bash examples/datamart/run.sh

test: setup
	bash .ci/test.sh
