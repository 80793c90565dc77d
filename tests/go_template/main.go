// Renders an Ollama-style Go template with Go's own text/template (what Ollama uses), for
// tests/test_export.py: stdin {"template": "...", "messages": [{"role": ..., "content": ...}]},
// stdout the rendered prompt.
package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Input struct {
	Template string    `json:"template"`
	Messages []Message `json:"messages"`
}

func main() {
	var in Input
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	t := template.Must(template.New("prompt").Parse(in.Template))
	if err := t.Execute(os.Stdout, map[string]any{"Messages": in.Messages}); err != nil {
		panic(err)
	}
}
