# fi-backup — see README.md. Every target that needs libvirtd sets the host up
# first with scripts/setup-host.sh (idempotent, quiet when all is in place).
SHELL := /bin/bash
VERSION ?= 3.1.0
PREFIX ?= /usr/local
MANDIR ?= $(PREFIX)/share/man
BASHCOMPDIR ?= $(PREFIX)/share/bash-completion/completions
GO ?= go
GOFLAGS_BUILD := -trimpath -ldflags "-X github.com/fi-backup/fi-backup/internal/cli.Version=$(VERSION)"
export PATH := /usr/local/go/bin:$(PATH)

.PHONY: help build install uninstall setup test test-unit test-integration vet fmt-check demo sweep bench clean

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

setup: ## install and start libvirtd + QEMU (root, Debian 12, no systemd needed)
	@bash scripts/setup-host.sh

build: setup ## build bin/fi-backup
	CGO_ENABLED=1 $(GO) build $(GOFLAGS_BUILD) -o bin/fi-backup ./cmd/fi-backup

# install never runs the test-host setup (it would rewrite qemu.conf and
# restart libvirtd on a production host): it builds bin/fi-backup only when
# it is missing (that needs Go and libvirt-dev). The man page is installed
# uncompressed (man reads it either way; a distribution package may gzip it).
install: ## install fi-backup, its man page and bash completion under $(DESTDIR)$(PREFIX)
	@test -x bin/fi-backup || CGO_ENABLED=1 $(GO) build $(GOFLAGS_BUILD) -o bin/fi-backup ./cmd/fi-backup
	install -D -m 0755 bin/fi-backup $(DESTDIR)$(PREFIX)/bin/fi-backup
	install -D -m 0644 cmd/fi-backup/fi-backup.8 $(DESTDIR)$(MANDIR)/man8/fi-backup.8
	install -D -m 0644 cmd/fi-backup/fi-backup.bash $(DESTDIR)$(BASHCOMPDIR)/fi-backup

uninstall: ## remove what make install installed (same PREFIX and DESTDIR)
	rm -f $(DESTDIR)$(PREFIX)/bin/fi-backup $(DESTDIR)$(MANDIR)/man8/fi-backup.8 $(DESTDIR)$(BASHCOMPDIR)/fi-backup

fmt-check: ## fail when gofmt would change a file
	@out=$$(gofmt -l cmd internal); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

vet: ## go vet
	$(GO) vet ./...

test-unit: ## unit tests only (no libvirtd needed)
	$(GO) test -race -count=1 -short ./...

test: setup fmt-check vet ## every tier: unit, CLI contract and real-libvirtd integration
	bash scripts/sweep.sh
	FI_BACKUP_TEST_DISALLOW_SKIP=$${FI_BACKUP_TEST_DISALLOW_SKIP:-1} $(GO) test -race -count=1 -p 1 -timeout 40m ./... 2>&1 | tee /tmp/fi-backup-test.log; exit $${PIPESTATUS[0]}

demo: build ## back up a throwaway running domain twice and show the backup chain
	bash scripts/demo.sh

sweep: ## remove leftover fibt-* test domains and files
	bash scripts/sweep.sh

bench: build ## performance table vs cp and the targets (root, ~5 min) → stdout and bin/performance.md
	bash scripts/bench.sh

clean:
	rm -rf bin
