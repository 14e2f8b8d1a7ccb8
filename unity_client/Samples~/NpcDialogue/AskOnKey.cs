using UnityEngine;
#if ENABLE_INPUT_SYSTEM
using UnityEngine.InputSystem;
#endif

/// <summary>Press the key to ask the NPC a line, and await the whole answer. Reads the keyboard
/// through the Input System package when the project uses it (Player Settings → Active Input
/// Handling: "Input System Package" or "Both"), else through the legacy Input Manager: the
/// legacy Input.GetKeyDown throws when only the Input System is active.</summary>
public sealed class AskOnKey : MonoBehaviour
{
    public NpcSpeaker npc;
#if ENABLE_INPUT_SYSTEM
    public Key key = Key.E;
    bool Pressed() => Keyboard.current != null && Keyboard.current[key].wasPressedThisFrame;
#else
    public KeyCode key = KeyCode.E;
    bool Pressed() => Input.GetKeyDown(key);
#endif
    public string line = "Any news from the road?";

    async void Update()
    {
        if (!Pressed()) return;
        var result = await npc.Answer("Player", line).Completion;
        if (this == null || result.Failed) return;
        Debug.Log(npc.persona + " said: " + result.Text + " (" + result.Reason + ")");
        // a structured line (NpcSpeaker.structured): what the NPC felt and did; result.Json is the whole reply
        if (result.Action != null) Debug.Log(npc.persona + " feels " + result.Emotion + " and does " + result.Action);
    }
}
