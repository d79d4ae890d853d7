# hsmagent: `make demo` runs the main job on a throwaway SoftHSM token,
# `make test` runs every test against real SoftHSM, OpenSSL and curl,
# `make install` and `make deb` install or package the agent for a host.

GO       ?= go
BIN      := bin/hsmagent
VERSION  := $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS  := -X main.version=$(VERSION)
APT_PKGS := softhsm2 opensc openssl curl ca-certificates prometheus
export PATH := $(PATH):/usr/local/go/bin

.PHONY: all build build-agent docs install deb test test-short fuzz demo deps lint generate clean bench fault-module

# Install locations (make install PREFIX=/usr DESTDIR=/tmp/root ...).
PREFIX         ?= /usr/local
BINDIR         ?= $(PREFIX)/bin
SYSCONFDIR     ?= /etc
SYSTEMDUNITDIR ?= $(PREFIX)/lib/systemd/system
SYSUSERSDIR    ?= $(PREFIX)/lib/sysusers.d
TMPFILESDIR    ?= $(PREFIX)/lib/tmpfiles.d
MANDIR         ?= $(PREFIX)/share/man
DOCDIR         ?= $(PREFIX)/share/doc/hsmagent
BASHCOMPDIR    ?= $(PREFIX)/share/bash-completion/completions
FISHCOMPDIR    ?= $(PREFIX)/share/fish/vendor_completions.d
ifeq ($(PREFIX),/usr)
ZSHCOMPDIR     ?= $(PREFIX)/share/zsh/vendor-completions
else
ZSHCOMPDIR     ?= $(PREFIX)/share/zsh/site-functions
endif

# Debian package: the version is the tag (v1.2.3 -> 1.2.3, +gitN.HASH after
# it), or 0.0.0~gitDATE.HASH before the first tag.
NFPM        := bin/nfpm
DEB_ARCH    ?= $(shell dpkg --print-architecture 2>/dev/null || $(GO) env GOARCH)
DEB_VERSION ?= $(shell v=$$(git describe --tags --match 'v[0-9]*' 2>/dev/null); \
	if [ -n "$$v" ]; then echo "$$v" | sed -e 's/^v//' -e 's/-\([0-9]*\)-g\([0-9a-f]*\)$$/+git\1.\2/'; \
	else echo "0.0.0~git$$(git log -1 --format=%cd --date=format:%Y%m%d%H%M%S 2>/dev/null || echo 0).$$(git rev-parse --short HEAD 2>/dev/null || echo dev)"; fi)
DEB         = bin/hsmagent_$(DEB_VERSION)_$(DEB_ARCH).deb

all: build

build: build-agent
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

build-agent:
	$(GO) build -ldflags "$(LDFLAGS)" -o $(BIN) ./cmd/hsmagent

# docs generates the man page and the shell completions from the CLI
# definition ('hsmagent man' and 'hsmagent completion').
docs: build-agent
	mkdir -p bin/doc
	$(BIN) man > bin/doc/hsmagent.1
	gzip -9nf bin/doc/hsmagent.1
	$(BIN) completion bash > bin/doc/hsmagent.bash
	$(BIN) completion zsh > bin/doc/_hsmagent
	$(BIN) completion fish > bin/doc/hsmagent.fish

# install never overwrites an existing $(SYSCONFDIR)/hsmagent/agent.yaml. The
# service user, groups and directories are made by systemd-sysusers and
# systemd-tmpfiles from the installed files (at boot, or by hand: see below).
install: docs
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(SYSTEMDUNITDIR) $(DESTDIR)$(SYSUSERSDIR) $(DESTDIR)$(TMPFILESDIR) \
		$(DESTDIR)$(MANDIR)/man1 $(DESTDIR)$(BASHCOMPDIR) $(DESTDIR)$(ZSHCOMPDIR) $(DESTDIR)$(FISHCOMPDIR) \
		$(DESTDIR)$(DOCDIR)/examples
	install -d -m 0750 $(DESTDIR)$(SYSCONFDIR)/hsmagent
	install -m 0755 $(BIN) $(DESTDIR)$(BINDIR)/hsmagent
	sed -e 's|/usr/bin/hsmagent|$(BINDIR)/hsmagent|g' -e 's|/etc/hsmagent/|$(SYSCONFDIR)/hsmagent/|g' \
		packaging/systemd/hsmagent.service > $(DESTDIR)$(SYSTEMDUNITDIR)/hsmagent.service
	chmod 0644 $(DESTDIR)$(SYSTEMDUNITDIR)/hsmagent.service
	install -m 0644 packaging/systemd/hsmagent.socket $(DESTDIR)$(SYSTEMDUNITDIR)/hsmagent.socket
	install -m 0644 packaging/sysusers.d/hsmagent.conf $(DESTDIR)$(SYSUSERSDIR)/hsmagent.conf
	sed -e 's|/etc/hsmagent|$(SYSCONFDIR)/hsmagent|g' packaging/tmpfiles.d/hsmagent.conf > $(DESTDIR)$(TMPFILESDIR)/hsmagent.conf
	chmod 0644 $(DESTDIR)$(TMPFILESDIR)/hsmagent.conf
	@if [ -e $(DESTDIR)$(SYSCONFDIR)/hsmagent/agent.yaml ]; then \
		echo "keeping the existing $(DESTDIR)$(SYSCONFDIR)/hsmagent/agent.yaml (new example: $(DESTDIR)$(DOCDIR)/examples/agent.yaml)"; \
	else \
		echo "install -m 0640 docs/agent.example.yaml $(DESTDIR)$(SYSCONFDIR)/hsmagent/agent.yaml"; \
		install -m 0640 docs/agent.example.yaml $(DESTDIR)$(SYSCONFDIR)/hsmagent/agent.yaml; \
	fi
	install -m 0644 bin/doc/hsmagent.1.gz $(DESTDIR)$(MANDIR)/man1/hsmagent.1.gz
	install -m 0644 bin/doc/hsmagent.bash $(DESTDIR)$(BASHCOMPDIR)/hsmagent
	install -m 0644 bin/doc/_hsmagent $(DESTDIR)$(ZSHCOMPDIR)/_hsmagent
	install -m 0644 bin/doc/hsmagent.fish $(DESTDIR)$(FISHCOMPDIR)/hsmagent.fish
	install -m 0644 docs/agent.example.yaml $(DESTDIR)$(DOCDIR)/examples/agent.yaml
	install -m 0644 packaging/systemd/drop-ins/network-hsm.conf packaging/systemd/drop-ins/vendor-device.conf \
		$(DESTDIR)$(DOCDIR)/examples/
	@if [ -z "$(DESTDIR)" ]; then \
		echo "next, as root: systemd-sysusers hsmagent.conf && systemd-tmpfiles --create hsmagent.conf && systemctl daemon-reload"; \
	fi

# deb builds bin/hsmagent_VERSION_ARCH.deb with nfpm (pinned in
# packaging/tools/go.mod); packaging/check-deb.sh checks and installs it.
deb: docs $(NFPM)
	rm -f bin/hsmagent_*.deb
	DEB_VERSION='$(DEB_VERSION)' DEB_ARCH='$(DEB_ARCH)' \
	SOURCE_DATE_EPOCH=$$(git log -1 --format=%ct 2>/dev/null || date +%s) \
		$(NFPM) package --config packaging/nfpm.yaml --packager deb --target $(DEB)

$(NFPM): packaging/tools/go.mod packaging/tools/go.sum
	$(GO) -C packaging/tools build -o ../../$(NFPM) github.com/goreleaser/nfpm/v2/cmd/nfpm

# deps installs the system packages the tests and the demo use: with apt-get
# when running as root, otherwise it prints the command to run.
deps:
	@missing=""; \
	command -v softhsm2-util >/dev/null || missing="$$missing softhsm2"; \
	command -v pkcs11-tool >/dev/null || missing="$$missing opensc"; \
	command -v openssl >/dev/null || missing="$$missing openssl"; \
	command -v curl >/dev/null || missing="$$missing curl"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
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

# fuzz runs every fuzz target for FUZZTIME each (go test runs their seed
# corpora in 'make test' already); new failing inputs land in testdata/fuzz.
# Minimising is capped: the request-path targets make RPCs, and go's default
# of 60 s per new input would take most of the run.
FUZZTIME ?= 30s
FUZZ_TARGETS := ./agent/server:FuzzSign ./agent/server:FuzzSignStream ./agent/server:FuzzPolicy \
	./cmd/hsmagent:FuzzLoadConfig ./hsm:FuzzParseSubject ./hsm:FuzzParseCertificatesPEM ./hsm/worker:FuzzParseSign \
	./agent/transport/p11rpc:FuzzDecodeRequest
fuzz:
	@set -e; for t in $(FUZZ_TARGETS); do \
		echo "== $${t#*:} ($${t%%:*}, $(FUZZTIME))"; \
		$(GO) test -run '^$$' -fuzz "^$${t#*:}$$" -fuzztime $(FUZZTIME) -fuzzminimizetime 5s "$${t%%:*}"; \
	done

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
