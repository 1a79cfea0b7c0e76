package main

import (
	"context"

	"github.com/cbtfs/cbtfs/internal/report"
	"github.com/cbtfs/cbtfs/qcow"
)

type infoCmd struct {
	JSON       bool   `help:"Print JSON in the shape of qemu-img info --output=json, with the whole chain under \"chain\"."`
	ForceShare bool   `short:"U" help:"Open without locks, like qemu-img -U (to look at an image another process has open for writing)."`
	Image      string `arg:"" help:"The top qcow2 image of the chain."`
}

func (c *infoCmd) Run(ctx context.Context, g *Globals) error {
	img, err := qcow.Open(c.Image, &qcow.Options{Logger: g.logger(), ForceShare: c.ForceShare})
	if err != nil {
		return err
	}
	defer img.Close()
	layers, err := img.Layers()
	if err != nil {
		return err
	}
	if c.JSON {
		_, err = g.stdout.Write(report.JSON(report.Info(layers, img.Bitmaps())))
	} else {
		_, err = g.stdout.Write(report.InfoText(layers, img.Bitmaps()))
	}
	return err
}
