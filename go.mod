module github.com/fi-backup/fi-backup

go 1.26.8

require (
	github.com/spf13/pflag v1.1.0
	github.com/stretchr/testify v1.12.1
	golang.org/x/sys v0.50.0
	golang.org/x/time v0.16.0
	libvirt.org/go/libvirt v1.11010.0
	libvirt.org/go/libvirtxml v1.12008.0
)

require go.yaml.in/yaml/v3 v3.0.5 // indirect
