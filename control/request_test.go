package control

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

func TestDecodeAction(t *testing.T) {
	tests := []struct {
		body    string
		want    ActionRequest
		wantErr string
	}{
		{`{"action":"pause"}`, ActionRequest{Action: "pause"}, ""},
		{` {"action": "resume"} `, ActionRequest{Action: "resume"}, ""},
		{`{"action":"stop","force":true}`, ActionRequest{Action: "stop", Force: true}, ""},
		{`{"force":false,"action":"stop"}`, ActionRequest{Action: "stop"}, ""},
		{`{"action":"pause","principal":{"id":"unix:root","groups":["wheel"],"auth":"system"}}`, ActionRequest{}, "identity comes from the socket"},
		{`{"action":"pause","uid":0}`, ActionRequest{}, `unknown key "uid"`},
		{`{"Action":"pause"}`, ActionRequest{}, `unknown key "Action"`},
		{`{"action":"pause","action":"stop"}`, ActionRequest{}, "appears twice"},
		{`{"action":"pause"}{}`, ActionRequest{}, "data after"},
		{`{"action":"pause"} x`, ActionRequest{}, "data after"},
		{`{"action":"reboot"}`, ActionRequest{}, "unknown action"},
		{`{}`, ActionRequest{}, "is required"},
		{`{"action":1}`, ActionRequest{}, "must be a string"},
		{`{"action":"stop","force":"yes"}`, ActionRequest{}, "true or false"},
		{`{"action":"pause","force":true}`, ActionRequest{}, "only valid with"},
		{`["pause"]`, ActionRequest{}, "must be a JSON object"},
		{`{"action":"pause"`, ActionRequest{}, "not JSON"},
		{``, ActionRequest{}, "not JSON"},
		{`{"action":"pause",}`, ActionRequest{}, "not JSON"},
		{`{"action":"pause","x":[1,2]}`, ActionRequest{}, "unknown key"},
		{`{"action":"p` + strings.Repeat("a", MaxBodyBytes) + `"}`, ActionRequest{}, "limit"},
	}
	for _, tc := range tests {
		got, err := DecodeAction([]byte(tc.body))
		switch {
		case tc.wantErr == "" && err != nil:
			t.Errorf("%.60s: %v", tc.body, err)
		case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
			t.Errorf("%.60s: error %v, want one containing %q", tc.body, err, tc.wantErr)
		case tc.wantErr == "" && got != tc.want:
			t.Errorf("%.60s: %+v, want %+v", tc.body, got, tc.want)
		}
	}
}

func TestDecodeRequest(t *testing.T) {
	tests := []struct {
		method, target, ctype, body string
		status                      int // 0: valid
		endpoint                    Endpoint
	}{
		{"GET", "/v1/ping", "", "", 0, EndpointPing},
		{"GET", "/v1/vm", "", "", 0, EndpointInspect},
		{"GET", "/v1/metrics", "", "", 0, EndpointMetrics},
		{"POST", "/v1/vm/actions", "application/json", `{"action":"pause"}`, 0, EndpointAction},
		{"POST", "/v1/vm/console", "", "", 0, EndpointConsole},
		{"GET", "/v1/vm?x=1", "", "", http.StatusBadRequest, 0},
		{"GET", "/v1/vm/", "", "", http.StatusNotFound, 0},
		{"GET", "/v1/%76m", "", "", http.StatusNotFound, 0},
		{"DELETE", "/v1/vm", "", "", http.StatusMethodNotAllowed, 0},
		{"GET", "/v1/vm/actions", "", "", http.StatusMethodNotAllowed, 0},
		{"GET", "/v1/vm", "", "x", http.StatusBadRequest, 0},
		{"POST", "/v1/vm/actions", "text/plain", `{"action":"pause"}`, http.StatusUnsupportedMediaType, 0},
		{"POST", "/v1/vm/actions", "application/json", `{"action":"pause","principal":"unix:root"}`, http.StatusBadRequest, 0},
		{"POST", "/v1/vm/actions", "application/json", strings.Repeat(" ", MaxBodyBytes+1), http.StatusRequestEntityTooLarge, 0},
	}
	for _, tc := range tests {
		r := httptest.NewRequest(tc.method, tc.target, strings.NewReader(tc.body))
		if tc.ctype != "" {
			r.Header.Set("Content-Type", tc.ctype)
		}
		req, err := DecodeRequest(r)
		if tc.status == 0 {
			if err != nil || req.Endpoint != tc.endpoint {
				t.Errorf("%s %s: %v, %+v", tc.method, tc.target, err, req)
			}
			continue
		}
		be, ok := err.(*BadRequestError)
		if !ok || be.Status != tc.status {
			t.Errorf("%s %s %.30q: error %v, want status %d", tc.method, tc.target, tc.body, err, tc.status)
		}
	}
}
