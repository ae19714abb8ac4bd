// The local-path provisioner's helper on the test node (its setupCommand and teardownCommand), so its helper pods
// need no shell image. The provisioner runs it as
//
//	volume-helper -p DIR -s SIZE_BYTES -m Filesystem|Block -a create|delete
//
// create makes DIR (mode 0777, as the provisioner's own setup script does: the pod's fsGroup then owns what it
// writes); delete removes DIR and everything in it. Only filesystem volumes are supported.
package main

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
)

func main() {
	dir := flag.String("p", "", "volume directory")
	flag.String("s", "", "requested size in bytes (a host directory has no quota)")
	mode := flag.String("m", "Filesystem", "volume mode")
	action := flag.String("a", "", "create or delete")
	flag.Parse()
	if err := run(*dir, *mode, *action); err != nil {
		fmt.Fprintln(os.Stderr, "volume-helper:", err)
		os.Exit(1)
	}
}

func run(dir, mode, action string) error {
	if !filepath.IsAbs(dir) || filepath.Clean(dir) == "/" {
		return fmt.Errorf("-p %q is not a volume directory", dir)
	}
	if mode != "Filesystem" {
		return fmt.Errorf("volume mode %q is not supported (only Filesystem)", mode)
	}
	switch action {
	case "create":
		if err := os.MkdirAll(dir, 0o777); err != nil {
			return err
		}
		// MkdirAll applies the umask; the mode must be exactly 0777.
		return os.Chmod(dir, 0o777)
	case "delete":
		return os.RemoveAll(dir)
	default:
		return fmt.Errorf("-a %q: want create or delete", action)
	}
}
