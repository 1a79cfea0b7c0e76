package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"strings"

	"github.com/alecthomas/kong"
)

// cli is the command line. Each command is a struct with a Run method.
type cli struct {
	Globals

	Mount   mountCmd   `cmd:"" help:"Mount a qcow2 image chain: the disk, its allocation maps and its bitmaps as files."`
	Info    infoCmd    `cmd:"" help:"Describe a qcow2 image chain: layers, sizes, formats, bitmaps."`
	Unmount unmountCmd `cmd:"" aliases:"umount" help:"Unmount a cbtfs mount and wait until the image is stored and its locks released."`
	Serve   serveCmd   `cmd:"" help:"Serve a qcow2 image chain over NBD, with qemu's meta contexts."`
	Map     mapCmd     `cmd:"" help:"List allocation, allocation-depth or bitmap extents as nbdinfo --map does."`
	Create  createCmd  `cmd:"" help:"Create a qcow2 image, optionally over a backing file."`
	Bitmap  bitmapCmd  `cmd:"" help:"Add, remove, clear, enable, disable or merge persistent bitmaps of an unmounted image."`
}

// Globals are the flags every command takes, and the streams it writes to.
type Globals struct {
	LogLevel  string `help:"Log level: debug, info, warn, error." enum:"debug,info,warn,error" default:"warn"`
	LogFormat string `help:"Log format: text or json." enum:"text,json" default:"text"`

	stdout io.Writer
	stderr io.Writer
	args   []string  // the command line, for re-executing as a daemon
	daemon *reporter // set in a daemonized mount child: where to report readiness
}

// logger builds the process's slog handler from the flags.
func (g *Globals) logger() *slog.Logger {
	var lvl slog.Level
	_ = lvl.UnmarshalText([]byte(g.LogLevel))
	o := &slog.HandlerOptions{Level: lvl}
	if g.LogFormat == "json" {
		return slog.New(slog.NewJSONHandler(g.stderr, o))
	}
	return slog.New(slog.NewTextHandler(g.stderr, o))
}

// exitCode carries kong's requested exit (after --help) out of Parse.
type exitCode int

// run parses args and runs the command; it returns the exit status.
// Errors are printed as one line on stderr.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) (status int) {
	c := cli{Globals: Globals{stdout: stdout, stderr: stderr, args: args, daemon: takeDaemonReporter()}}
	parser, err := kong.New(&c,
		kong.Name("cbtfs"),
		kong.Description("Change block tracking for qcow2 disks, as files."),
		kong.Writers(stdout, stderr),
		kong.Exit(func(code int) { panic(exitCode(code)) }),
		kong.BindTo(ctx, (*context.Context)(nil)),
		kong.UsageOnError(),
		kong.ConfigureHelp(kong.HelpOptions{Compact: true}),
	)
	if err != nil {
		fmt.Fprintf(stderr, "cbtfs: %v\n", err)
		return 2
	}
	defer func() {
		// kong asks to exit after printing help or a usage error.
		if r := recover(); r != nil {
			code, ok := r.(exitCode)
			if !ok {
				panic(r)
			}
			status = int(code)
		}
	}()
	kctx, err := parser.Parse(args)
	if err != nil {
		fmt.Fprintf(stderr, "cbtfs: %v\n", err)
		return 2
	}
	if err := kctx.Run(&c.Globals); err != nil {
		msg := oneLine(err)
		c.daemon.fail(msg)
		fmt.Fprintf(stderr, "cbtfs: %s\n", msg)
		return 1
	}
	return 0
}

// oneLine flattens an error message to a single line.
func oneLine(err error) string {
	return strings.Join(strings.Fields(strings.ReplaceAll(err.Error(), "\n", "; ")), " ")
}
