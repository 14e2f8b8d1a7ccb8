extends Control
## Asks the NPC a line when the button is pressed; the label fills as the text streams in.
## The guard's lines are structured (Structured is on in the scene): its emotion and action
## arrive as signals too, and each complete sentence (Segmentation is Sentence) for a TTS voice.

@onready var npc: Node = $NpcDialogue
@onready var label: Label = $Bubble
@onready var button: Button = $Ask

func _ready() -> void:
	npc.text_delta.connect(_on_text_delta)
	npc.line_finished.connect(_on_line_finished)
	npc.line_failed.connect(_on_line_failed)
	npc.emotion_changed.connect(_on_emotion_changed)
	npc.action_chosen.connect(_on_action_chosen)
	npc.sentence_ready.connect(_on_sentence_ready)
	button.pressed.connect(_on_ask)

func _on_ask() -> void:
	label.text = ""
	npc.Say("Player", "Any news from the road?", {"location": "the north gate"})

func _on_text_delta(_request_id: String, _text: String, full_text: String) -> void:
	label.text = full_text

func _on_line_finished(_request_id: String, text: String, _reason: int) -> void:
	label.text = text

func _on_line_failed(_request_id: String, code: int, message: String, retry_after_ms: int) -> void:
	label.text = "(no answer: %d %s)" % [code, message]
	if retry_after_ms > 0:  # the daemon is busy (code 8): ask again after its hint
		get_tree().create_timer(retry_after_ms / 1000.0).timeout.connect(_on_ask)

func _on_emotion_changed(_request_id: String, label_name: String) -> void:
	print("the guard feels ", label_name)

func _on_action_chosen(_request_id: String, action_name: String, args_json: String) -> void:
	print("the guard does ", action_name, " ", JSON.parse_string(args_json))

func _on_sentence_ready(_request_id: String, index: int, text: String) -> void:
	print("say aloud #", index, ": ", text)  # hand it to a TTS voice here
