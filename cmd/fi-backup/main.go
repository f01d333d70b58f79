// Command fi-backup makes online forward-incremental backups of libvirt/KVM
// domains; it is a drop-in replacement for fi-backup.sh.
package main

import (
	"os"

	"github.com/fi-backup/fi-backup/internal/cli"
	"github.com/fi-backup/fi-backup/internal/virt"
	"github.com/fi-backup/fi-backup/internal/virt/libvirtconn"
)

func main() {
	os.Exit(cli.Main(os.Args[1:], func(uri string) (virt.Hypervisor, error) {
		c, err := libvirtconn.Connect(uri)
		if err != nil {
			return nil, err // a typed nil in the interface would look connected
		}
		return c, nil
	}))
}
