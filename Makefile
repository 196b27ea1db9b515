# The two commands of the README's quick start. Both install what is missing first.
.PHONY: setup demo test test-stress package dashboard dashboard-demo

setup:
	bash .ci/setup.sh

demo: setup
	bash examples/datamart/run.sh

test: setup
	bash .ci/test.sh

# The integration and fault suites under CPU contention, 10 rounds (STRESS_ROUNDS=N).
test-stress: setup
	bash .ci/stress.sh

# A Debian package of this build: target/postgresql-15-pg-chunkwise_<version>-1_amd64.deb
package: setup
	bash .ci/package.sh

# The web dashboard: target/release/chunkwise-dashboard (see README, "Dashboard").
dashboard:
	bash .ci/dashboard.sh

# The dashboard against the datamart demo's cluster, on http://127.0.0.1:8080/.
dashboard-demo: setup dashboard
	bash examples/dashboard/run.sh
