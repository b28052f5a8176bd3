// probe runs as a container's process on the libdm snapshotter: it prints
// what it reads from the image's files, then writes into its own root, so a
// test can see both through the snapshot's mounts.  Static, no libc.
package main

import (
	"fmt"
	"os"
	"sort"
)

func main() {
	host, err := os.ReadFile("/etc/hostname")
	if err != nil {
		fmt.Println("error:", err)
		os.Exit(1)
	}
	entries, err := os.ReadDir("/dir")
	if err != nil {
		fmt.Println("error:", err)
		os.Exit(1)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	sort.Strings(names)
	line := fmt.Sprintf("hostname-file=%q dir=%v uid=%d\n", string(host), names, os.Getuid())
	fmt.Print(line)
	// Also into its root: stdout passes through containerd's fifos, which
	// can lose a short-lived process's output; the snapshot cannot.
	if err := os.WriteFile("/probe-output", []byte(line), 0644); err != nil {
		fmt.Println("error:", err)
		os.Exit(1)
	}
	if err := os.WriteFile("/written-by-container", []byte("hello\n"), 0644); err != nil {
		fmt.Println("error:", err)
		os.Exit(1)
	}
}
