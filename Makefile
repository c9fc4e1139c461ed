# Convenience wrappers; the scripts are the source of truth.
.PHONY: all deps build demo test bench clean
all: build
deps:
	scripts/install-deps.sh --test
build:
	scripts/build.sh
demo:
	scripts/demo.sh
test:
	scripts/test.sh
bench:
	bench/cpu_bench.sh
clean:
	rm -rf build
