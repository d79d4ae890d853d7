# hsmagent: `make demo` runs the main job on a throwaway SoftHSM token,
# `make test` runs every test against real SoftHSM, OpenSSL and curl.

GO       ?= go
BIN      := bin/hsmagent
VERSION  := $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS  := -X main.version=$(VERSION)
APT_PKGS := softhsm2 opensc openssl curl ca-certificates
export PATH := $(PATH):/usr/local/go/bin

.PHONY: all build test test-short demo deps lint generate clean bench fault-module

all: build

build:
	$(GO) build -ldflags "$(LDFLAGS)" -o $(BIN) ./cmd/hsmagent
	$(GO) build -o bin/ ./softhsm-test/cmd/mtls-get ./softhsm-test/cmd/echo-backend
	$(MAKE) --no-print-directory fault-module

# fault-module builds the PKCS#11 module that forwards to SoftHSM and injects
# latency, errors and hangs (softhsm-test/faultmodule/README.md). The PKCS#11
# headers come from the miekg/pkcs11 module in the Go module cache.
FAULT_SO := bin/libhsmagent-fault.so
fault-module: $(FAULT_SO)
$(FAULT_SO): softhsm-test/faultmodule/fault.c go.sum
	@mkdir -p bin
	$(GO) mod download github.com/miekg/pkcs11
	gcc -shared -fPIC -O2 -Wall -Werror -I "$$($(GO) list -m -f '{{.Dir}}' github.com/miekg/pkcs11)" \
		-o $@ softhsm-test/faultmodule/fault.c -ldl -lpthread

# deps installs the system packages the tests and the demo use: with apt-get
# when running as root, otherwise it prints the command to run.
deps:
	@missing=""; \
	command -v softhsm2-util >/dev/null || missing="$$missing softhsm2"; \
	command -v pkcs11-tool >/dev/null || missing="$$missing opensc"; \
	command -v openssl >/dev/null || missing="$$missing openssl"; \
	command -v curl >/dev/null || missing="$$missing curl"; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			echo "installing:$$missing"; \
			DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PKGS) >/dev/null; \
		else \
			echo "missing:$$missing; run: sudo apt-get install -y $(APT_PKGS)"; exit 1; \
		fi; \
	fi

test: deps
	$(GO) test -race -count=1 ./...

test-short:
	$(GO) test -short -count=1 ./...

demo: deps build
	bash softhsm-test/demo.sh $(BIN)

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...

clean:
	rm -rf bin .demo

# generate rebuilds the gRPC code from agent/proto (needs protoc: apt-get install protobuf-compiler).
generate:
	$(GO) build -o bin/ google.golang.org/protobuf/cmd/protoc-gen-go google.golang.org/grpc/cmd/protoc-gen-go-grpc
	protoc --plugin=protoc-gen-go=bin/protoc-gen-go --plugin=protoc-gen-go-grpc=bin/protoc-gen-go-grpc \
		-I agent/proto --go_out=. --go_opt=module=github.com/hsmagent/hsmagent \
		--go-grpc_out=. --go-grpc_opt=module=github.com/hsmagent/hsmagent \
		hsmagent/v1/agent.proto
