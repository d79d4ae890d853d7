package core

import (
	"testing"
	"time"
)

const day = 24 * time.Hour

func TestExpiryBand(t *testing.T) {
	tests := []struct {
		left time.Duration
		want int
	}{
		{100 * day, -1},
		{30*day + time.Second, -1},
		{30 * day, 0},
		{15 * day, 0},
		{14 * day, 1},
		{8 * day, 1},
		{7 * day, 2},
		{2 * day, 2},
		{day, 3},
		{time.Second, 3},
		{0, 4},
		{-day, 4},
	}
	for _, tt := range tests {
		if got := expiryBand(tt.left); got != tt.want {
			t.Errorf("expiryBand(%v) = %d, want %d", tt.left, got, tt.want)
		}
	}
}
