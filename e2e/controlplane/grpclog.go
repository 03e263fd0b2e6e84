package main

import (
	"fmt"
	"strings"

	"google.golang.org/grpc/grpclog"
	"k8s.io/klog/v2"
)

// The apiserver's etcd client routes gRPC's own logging to klog. At start-up
// and shutdown it cancels dials it no longer needs and gRPC warns about each
// one ("... operation was canceled"): dozens of lines that mean nothing. This
// logger replaces the apiserver's (main's init runs after every imported
// package's) and behaves the same except that it drops those.
func init() {
	grpclog.SetLoggerV2(grpcKlog{})
}

type grpcKlog struct{}

const grpcKlogDepth = 4

func noise(msg string) bool {
	return strings.Contains(msg, "operation was canceled") || strings.Contains(msg, "context canceled")
}

func (grpcKlog) Info(args ...any) {
	if v := klog.V(5); v.Enabled() {
		v.InfoSDepth(grpcKlogDepth, fmt.Sprint(args...))
	}
}

func (grpcKlog) Infoln(args ...any) {
	if v := klog.V(5); v.Enabled() {
		v.InfoSDepth(grpcKlogDepth, fmt.Sprintln(args...))
	}
}

func (grpcKlog) Infof(format string, args ...any) {
	if v := klog.V(5); v.Enabled() {
		v.InfoSDepth(grpcKlogDepth, fmt.Sprintf(format, args...))
	}
}

func (grpcKlog) Warning(args ...any) {
	if msg := fmt.Sprint(args...); !noise(msg) {
		klog.WarningDepth(grpcKlogDepth, msg)
	}
}

func (grpcKlog) Warningln(args ...any) {
	if msg := fmt.Sprintln(args...); !noise(msg) {
		klog.WarningDepth(grpcKlogDepth, msg)
	}
}

func (grpcKlog) Warningf(format string, args ...any) {
	if msg := fmt.Sprintf(format, args...); !noise(msg) {
		klog.WarningDepth(grpcKlogDepth, msg)
	}
}

func (grpcKlog) Error(args ...any) { klog.ErrorDepth(grpcKlogDepth, args...) }

func (grpcKlog) Errorln(args ...any) { klog.ErrorDepth(grpcKlogDepth, fmt.Sprintln(args...)) }

func (grpcKlog) Errorf(format string, args ...any) {
	klog.ErrorDepth(grpcKlogDepth, fmt.Sprintf(format, args...))
}

func (grpcKlog) Fatal(args ...any) { klog.FatalDepth(grpcKlogDepth, args...) }

func (grpcKlog) Fatalln(args ...any) { klog.FatalDepth(grpcKlogDepth, fmt.Sprintln(args...)) }

func (grpcKlog) Fatalf(format string, args ...any) {
	klog.FatalDepth(grpcKlogDepth, fmt.Sprintf(format, args...))
}

func (grpcKlog) V(l int) bool { return klog.V(klog.Level(l)).Enabled() }
