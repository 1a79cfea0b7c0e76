package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/cbtfs/cbtfs/fsnode"
	"github.com/cbtfs/cbtfs/qcow"
)

type mountCmd struct {
	ReadOnly   bool   `short:"r" help:"Serve the chain read-only: no writes, no bitmap changes, shared locks."`
	NBD        string `name:"nbd" help:"Also serve the chain over NBD at ADDR (unix:PATH or HOST:PORT), from the same engine." placeholder:"ADDR"`
	ExportName string `help:"The NBD export's name (default \"\", as qemu-nbd)." default:""`
	Daemon     bool   `help:"Return once the mount is ready; the exit status says whether it succeeded."`
	AllowOther bool   `help:"Let other users access the mount (needs user_allow_other in /etc/fuse.conf unless root)."`
	Debug      bool   `help:"Log every FUSE request."`
	Image      string `arg:"" help:"The top qcow2 image of the chain."`
	Mountpoint string `arg:"" type:"path" help:"An empty directory to mount on."`
}

func (m *mountCmd) Run(ctx context.Context, g *Globals) error {
	if m.Daemon && g.daemon == nil {
		return daemonize(g.args)
	}
	log := g.logger()
	if err := prepareMountpoint(m.Mountpoint, log); err != nil {
		return err
	}
	img, err := qcow.Open(m.Image, &qcow.Options{Logger: log, Writable: !m.ReadOnly})
	if err != nil {
		return err
	}
	defer img.Close()

	var nbd *nbdServer
	nctx, stopNBD := context.WithCancel(ctx)
	defer stopNBD()
	if m.NBD != "" {
		if nbd, err = startNBD(nctx, img, m.NBD, m.ExportName, log); err != nil {
			return err
		}
	}
	// finish stops the NBD listener (in-flight requests complete), then
	// stores the bitmaps and closes the image.
	finish := func() error {
		stopNBD()
		var nerr error
		if nbd != nil {
			nerr = nbd.wait()
		}
		return errors.Join(nerr, img.Close())
	}

	abs, _ := filepath.Abs(m.Image)
	root := fsnode.NewRoot(img, &fsnode.Options{Logger: log})
	timeout := time.Second
	opts := &fs.Options{
		MountOptions: fuse.MountOptions{
			FsName:       abs,
			Name:         "cbtfs",
			AllowOther:   m.AllowOther,
			Debug:        m.Debug,
			MaxWrite:     1 << 20,
			MaxReadAhead: 1 << 20,
			Options:      mountFlags(m.ReadOnly),
			// The kernel may use several threads; the engine is safe for
			// parallel reads.
			MaxBackground: 64,
			Logger:        fuseLogger(m.Debug, g.stderr),
		},
		EntryTimeout: &timeout,
		AttrTimeout:  &timeout,
	}
	// Signals are handled here, not through ctx, so that a second signal
	// can be seen after a busy unmount.
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	defer signal.Stop(sigs)

	server, err := fs.Mount(m.Mountpoint, root, opts)
	if err != nil {
		finish()
		return fmt.Errorf("mount %s: %w", m.Mountpoint, err)
	}
	g.daemon.ready()
	done := make(chan struct{})
	go func() {
		server.Wait()
		close(done)
	}()
	for {
		select {
		case <-done:
			return finish()
		case <-sigs:
			if err := server.Unmount(); err != nil {
				log.Warn("unmount failed; still mounted (unmount later with fusermount3 -u)", "mountpoint", m.Mountpoint, "err", err)
				continue
			}
		}
	}
}

// mountFlags returns the FUSE mount options.
func mountFlags(ro bool) []string {
	if ro {
		return []string{"ro", "default_permissions"}
	}
	return []string{"default_permissions"}
}

// prepareMountpoint checks that mnt is a directory cbtfs can mount on. A
// mountpoint left behind by a killed FUSE server ("Transport endpoint is
// not connected") is detached first; a live mount is refused.
func prepareMountpoint(mnt string, log *slog.Logger) error {
	// statfs is never answered from the kernel's attribute cache, so a
	// server killed a moment ago shows as ENOTCONN at once (stat may still
	// succeed for up to the attribute timeout).
	var st unix.Statfs_t
	err := unix.Statfs(mnt, &st)
	if errors.Is(err, syscall.ENOTCONN) {
		log.Info("clearing stale mount", "mountpoint", mnt)
		if err := detach(mnt); err != nil {
			return fmt.Errorf("%s: stale mount (transport endpoint is not connected) could not be cleared: %w", mnt, err)
		}
	}
	_, err = os.Stat(mnt)
	if err != nil {
		return fmt.Errorf("mountpoint: %w", err)
	}
	if fi, _ := os.Stat(mnt); !fi.IsDir() {
		return fmt.Errorf("mountpoint %s: not a directory", mnt)
	}
	if mounted, err := isMountpoint(mnt); err == nil && mounted {
		return fmt.Errorf("mountpoint %s: already mounted (unmount it first with fusermount3 -u)", mnt)
	}
	return nil
}

// detach lazily unmounts mnt: directly when privileged, else through
// fusermount3.
func detach(mnt string) error {
	err := syscall.Unmount(mnt, syscall.MNT_DETACH)
	if err == nil {
		return nil
	}
	out, ferr := exec.Command("fusermount3", "-u", "-z", mnt).CombinedOutput()
	if ferr != nil {
		return fmt.Errorf("%v; fusermount3: %s", err, strings.TrimSpace(string(out)))
	}
	return nil
}

// isMountpoint reports whether mnt is the mount point of a mounted file
// system, from /proc/self/mountinfo.
func isMountpoint(mnt string) (bool, error) {
	abs, err := filepath.Abs(mnt)
	if err != nil {
		return false, err
	}
	if real, err := filepath.EvalSymlinks(abs); err == nil {
		abs = real
	}
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return false, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) > 4 && unescapeMountinfo(fields[4]) == abs {
			return true, nil
		}
	}
	return false, sc.Err()
}

// unescapeMountinfo undoes the octal escapes (\040 for space) of
// /proc/self/mountinfo paths.
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			var v byte
			ok := true
			for _, c := range s[i+1 : i+4] {
				if c < '0' || c > '7' {
					ok = false
					break
				}
				v = v*8 + byte(c-'0')
			}
			if ok {
				b.WriteByte(v)
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
